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
from collections import Counter
from collections.abc import Callable, Iterable, Iterator

from bgpd import logs
from bgpd.controllers.plan import (
    DEFAULT_GC_GRACE,
    ControllerConfigError,
    EndpointRecord,
    Observed,
    Plan,
    ReleasePod,
    RemoveNode,
    Settings,
    calico_nodes,
    plan_actions,
    pod_allocations,
)
from bgpd.kube import Kube, KubeError
from bgpd.resources import WorkloadEndpoint
from ipam import keys
from ipam.allocator import IPAM
from ipam.check import load_state
from ipam.datastore import Datastore, Delete, EtcdConfig, KeyValue, ModRevisionIs
from ipam.errors import IPAMError
from ipam.nodes import remove_node

log = logging.getLogger("calico-py-kube-controllers")


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
        endpoint_kvs = await self.ipam.store.get_prefix(keys.resource_prefix(keys.WORKLOAD_ENDPOINTS))
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
    logs.start(env, log)
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
