"""calico-py-kube-controllers: releases the addresses of pods and nodes Kubernetes no longer has.

One replica. Every ``CONTROLLER_INTERVAL`` seconds it reads IPAM (one etcd snapshot) and then the pod and node
lists (through :mod:`bgpd.kube`), computes what to do with the pure :func:`plan_actions`, and applies it:

- a pod's addresses (a handle whose allocation carries the ``namespace`` / ``pod`` attributes the CNI plugin
  sets) are released, and its WorkloadEndpoint deleted, once the pod has been missing, on another node,
  finished (Succeeded / Failed), or replaced by a newer sandbox (its endpoint names another container) for
  ``CONTROLLER_GC_GRACE`` seconds in a row;
- a node known to Calico (a Node resource or block affinities) but not to Kubernetes for as long is removed:
  its addresses (tunnel addresses too), affinities, empty blocks, endpoints and Node resource
  (:func:`ipam.nodes.remove_node`).

The first time something is seen missing is kept in memory only: a restarted controller starts every grace
period again, so it can release late but never early.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import sys
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field

from bgpd import logs
from bgpd.kube import Kube, KubeError, KubePod
from bgpd.resources import WorkloadEndpoint
from ipam import keys
from ipam.allocator import IPAM
from ipam.check import IPAMState, is_tunnel_handle, load_state
from ipam.datastore import Datastore, Delete, EtcdConfig, KeyValue, ModRevisionIs
from ipam.errors import IPAMError
from ipam.model import Block, IPAddress
from ipam.nodes import allocations, remove_node

log = logging.getLogger("calico-py-kube-controllers")

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
        return cls(interval=_seconds(env, "CONTROLLER_INTERVAL", DEFAULT_INTERVAL, allow_zero=False),
                   gc_grace=_seconds(env, "CONTROLLER_GC_GRACE", DEFAULT_GC_GRACE, allow_zero=True))


def _seconds(env: Mapping[str, str], name: str, default: float, allow_zero: bool) -> float:
    text = env.get(name, "").strip()
    if not text:
        return default
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not (value > 0 or (allow_zero and value == 0)):
        bound = ">= 0" if allow_zero else "> 0"
        raise ControllerConfigError(f"{name}={text!r}: give a number of seconds {bound}, e.g. {default:g}")
    return value


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


def _endpoint_records(kvs: Iterable[KeyValue]) -> Iterator[EndpointRecord]:
    for kv in kvs:
        try:
            yield EndpointRecord(kv.key, kv.mod_revision, WorkloadEndpoint.from_v3(kv.json()))
        except (KeyError, TypeError, ValueError):  # one bad record must not stop every round
            log.warning("action=skip-endpoint key=%s reason=not-a-WorkloadEndpoint", kv.key)


class Controller:
    def __init__(self, kube: Kube, ipam: IPAM, gc_grace: float = DEFAULT_GC_GRACE,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.kube = kube
        self.ipam = ipam
        self.gc_grace = gc_grace
        self._clock = clock
        self.missing_since: dict[str, float] = {}
        # Counters for metrics (a later issue): rounds, releases, removals, failures.
        self.stats: Counter[str] = Counter()

    async def observe(self) -> Observed:
        # IPAM first, Kubernetes second: a pod exists before its CNI ADD allocates, so every allocation read here
        # has its pod in the lists read after (no pod looks missing for having been created mid-round).
        state = await load_state(self.ipam.store)
        endpoint_kvs = await self.ipam.store.get_prefix(keys.resource_prefix("workloadendpoints"))
        pods, nodes = await asyncio.gather(asyncio.to_thread(self.kube.list_pods),
                                           asyncio.to_thread(self.kube.list_nodes))
        return Observed(
            pods={(p.namespace, p.name): p for p in pods},
            kube_nodes=frozenset(n.name for n in nodes),
            calico_nodes=calico_nodes(state),
            allocations=tuple(pod_allocations(block for block, _ in state.blocks.values())),
            endpoints=tuple(_endpoint_records(endpoint_kvs)),
        )

    async def run_once(self, now: float | None = None) -> Plan:
        """One round: observe, plan, apply. ``now`` (seconds on the controller's clock) is for tests."""
        now = self._clock() if now is None else now
        observed = await self.observe()
        plan = plan_actions(observed, self.missing_since, now, self.gc_grace)
        for key in plan.missing_since.keys() - self.missing_since.keys():
            log.info("action=gc-pending subject=%s grace=%gs", key, self.gc_grace)
        self.missing_since = plan.missing_since
        self.stats["rounds"] += 1
        for action in plan.actions:
            if isinstance(action, RemoveNode):
                await self._remove_node(action)
            else:
                await self._release_pod(action)
        return plan

    async def _release_pod(self, action: ReleasePod) -> None:
        allocation = action.allocation
        sequence_numbers = {a: s for a, s in allocation.addresses.items() if s}
        kept = set(await self.ipam.release_ips(list(allocation.addresses), handle_id=allocation.handle,
                                               sequence_numbers=sequence_numbers))
        released = [str(a) for a in allocation.addresses if a not in kept]
        self.stats["pod_handles_released"] += 1
        self.stats["pod_ips_released"] += len(released)
        log.info("action=release-pod-ips handle=%s namespace=%s pod=%s node=%s reason=%s missing_for=%.0fs "
                 "released=%s", allocation.handle, allocation.namespace, allocation.pod, allocation.node,
                 action.reason, action.missing_for, ",".join(released) or "-")
        await self._delete_endpoints(action.endpoints)

    async def _remove_node(self, action: RemoveNode) -> None:
        removal = await remove_node(self.ipam, action.node)
        self.stats["nodes_removed"] += 1
        self.stats["node_ips_released"] += len(removal.released)
        self.stats["node_blocks_freed"] += len(removal.blocks_deleted) + len(removal.blocks_unaffined)
        log.info("action=remove-node node=%s missing_for=%.0fs released=%d blocks_deleted=%s blocks_unaffined=%s "
                 "node_resource_deleted=%s", action.node, action.missing_for, len(removal.released),
                 ",".join(map(str, removal.blocks_deleted)) or "-",
                 ",".join(map(str, removal.blocks_unaffined)) or "-", removal.node_resource_deleted)
        await self._delete_endpoints(action.endpoints)

    async def _delete_endpoints(self, endpoints: Iterable[EndpointRecord]) -> None:
        for record in endpoints:
            # Guarded: an endpoint rewritten since we read it belongs to a newer sandbox and stays.
            result = await self.ipam.store.txn([ModRevisionIs(record.key, record.mod_revision)],
                                               [Delete(record.key)])
            outcome = "deleted" if result.succeeded else "changed-kept"
            self.stats["endpoints_deleted" if result.succeeded else "endpoints_kept"] += 1
            log.info("action=delete-endpoint namespace=%s name=%s container=%s outcome=%s",
                     record.endpoint.namespace, record.endpoint.name, record.endpoint.container_id, outcome)

    async def run(self, interval: float, stop: asyncio.Event) -> None:
        """Rounds every ``interval`` seconds until ``stop`` is set; a failed round is logged and retried at the
        next one (nothing is released on a round that could not see everything)."""
        while not stop.is_set():
            try:
                await self.run_once()
            except (KubeError, IPAMError) as exc:
                self.stats["round_errors"] += 1
                log.error("action=round-failed error=%s", " ".join(str(exc).split()))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), interval)


async def serve(settings: Settings, kube: Kube, etcd: EtcdConfig) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    async with Datastore(etcd) as store:
        controller = Controller(kube, IPAM(store), settings.gc_grace)
        log.info("action=start interval=%gs gc_grace=%gs kubernetes=%s etcd=%s", settings.interval,
                 settings.gc_grace, kube.server, ",".join(etcd.endpoints))
        await controller.run(settings.interval, stop)


def main() -> int:
    env = dict(os.environ)
    problem = logs.setup(env)
    if problem:
        log.warning("%s", problem)
    try:
        settings = Settings.from_env(env)
        kube = Kube.from_env(env)
        if kube is None:
            raise KubeError("no Kubernetes API configured: set KUBECONFIG, or run in a pod (KUBERNETES_SERVICE_HOST)")
        with kube:
            asyncio.run(serve(settings, kube, EtcdConfig.from_env(env)))
    except (ControllerConfigError, KubeError, IPAMError) as exc:
        print(f"calico-py-kube-controllers: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
