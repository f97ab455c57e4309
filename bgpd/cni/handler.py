"""The daemon side of CNI: ADD / DEL / CHECK / STATUS / GC with warm etcd and netlink connections.

ADD is all or nothing: if a step after IPAM fails, the plumbing made so far is removed and the addresses are
released before the error goes back, so a runtime never sees a half-plumbed pod.

The pod's network namespace comes as a descriptor the shim opened (``spec.Netns``); CNI_NETNS is never opened
here. DEL needs none: it works on the host side only, so it succeeds when the namespace is already gone.
"""

from __future__ import annotations

import asyncio
import dataclasses
import ipaddress
import json
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from bgpd.cleanup import release_unattached
from bgpd.cni import spec
from bgpd.cni.addresses import DatastoreDown, PodAddresses
from bgpd.cni.annotations import PodSource
from bgpd.cni.spec import CNIError, Request, Result
from bgpd.dataplane import workloads
from bgpd.dataplane.pod_kernel import PodKernel
from bgpd.resources import WorkloadEndpoint, wep_key, wep_name
from bgpd.store import delete_wep, list_node_weps, save_wep
from ipam.allocator import IPAM
from ipam.datastore import Put
from ipam.errors import DatastoreUnavailable

log = logging.getLogger("calico-py-node.cni")
T = TypeVar("T")
MAIN, IPAM_PLUGIN = "calico-py", "calico-py-ipam"
# How long a failed ADD's clean-up waits for a datastore that was just found unreachable: the store already had
# its full failover time, so waiting that long again would only double the runtime's wait for the same answer.
UNDO_DATASTORE_SECONDS = 3.0


def with_addresses(workload: workloads.Workload, addresses: list[ipaddress.IPv4Address | ipaddress.IPv6Address]
                   ) -> workloads.Workload:
    return dataclasses.replace(workload, addresses=tuple(ipaddress.ip_interface(f"{a}/{a.max_prefixlen}")
                                                         for a in addresses))


async def _all(steps: list[Awaitable[Any]]) -> list[Any]:
    """Run ``steps`` side by side and wait for every one of them; then raise the first failure, if any."""
    outcomes = await asyncio.gather(*steps, return_exceptions=True)
    for outcome in outcomes:
        if isinstance(outcome, BaseException):
            raise outcome
    return outcomes


class CNIHandler:
    def __init__(self, ipam: IPAM, node: str, kernel: PodKernel, default_mtu: Callable[[], int],
                 changed: Callable[[], None] = lambda: None, pods: PodSource | None = None,
                 observe: Callable[[str, str, float], None] = lambda command, result, seconds: None,
                 on_endpoint: Callable[[str, WorkloadEndpoint | None], None] = lambda key, endpoint: None) -> None:
        self.ipam = ipam
        self.node = node
        self.addresses = PodAddresses(ipam, node, pods)
        self.observe = observe  # (command, "ok" | "error", seconds) of every request: metrics
        self.kernel = kernel
        self.default_mtu = default_mtu  # the pod MTU when the network config gives none: underlay minus encap
        self.changed = changed  # wakes the reconciler (a new block may need its blackhole)
        # This node's endpoint written (None: deleted): the node's view knows before its watch event comes.
        self.on_endpoint = on_endpoint
        self._claimed = 0

    async def handle(self, plugin: str, env: dict[str, str], stdin: str, netns: spec.Netns = spec.NO_NETNS
                     ) -> tuple[int, str]:
        """One request; ``netns`` is CNI_NETNS as the shim opened it (its descriptor stays the caller's)."""
        started = time.monotonic()
        code, out = await self._handle(plugin, env, stdin, netns)
        self.observe(env.get("CNI_COMMAND", "?"), "ok" if code == 0 else "error", time.monotonic() - started)
        return code, out

    async def _handle(self, plugin: str, env: dict[str, str], stdin: str, netns: spec.Netns) -> tuple[int, str]:
        version = spec.CURRENT_VERSION
        try:
            request = spec.parse_request(env, stdin)
            version = request.cni_version
            body = await self._dispatch(plugin, request, netns)
            return 0, json.dumps(body) + "\n" if body is not None else ""
        except CNIError as exc:
            log.warning("cni %s %s failed: code=%s %s", env.get("CNI_COMMAND"), env.get("CNI_CONTAINERID"),
                        exc.code, exc.msg)
            return 1, json.dumps(exc.to_json(version)) + "\n"
        except Exception as exc:  # never let a bug leave the runtime without an answer
            log.exception("cni %s crashed", env.get("CNI_COMMAND"))
            return 1, json.dumps(CNIError(spec.INTERNAL, f"internal error: {exc}").to_json(version)) + "\n"

    async def _dispatch(self, plugin: str, request: Request, netns: spec.Netns) -> dict[str, Any] | None:
        command = request.command
        if command == "VERSION":
            return spec.version_result(request.cni_version)
        if command == "STATUS":
            await self.addresses.datastore(self.ipam.get_config())
            return None
        if command == "GC":
            await self._gc(request)
            return None
        if plugin == MAIN:
            ipam_type = (request.config.get("ipam") or {}).get("type", IPAM_PLUGIN)
            if ipam_type != IPAM_PLUGIN:
                raise CNIError(spec.INVALID_NETWORK_CONFIG, f"ipam type {ipam_type!r} is not supported by calico-py; "
                                                            f"use {IPAM_PLUGIN}")
            if command == "DEL":
                return await self._del(request)
            return await {"ADD": self._add, "CHECK": self._check}[command](request, self._pod_netns(netns))
        addresses = self.addresses
        return await {"ADD": addresses.ipam_add, "DEL": addresses.ipam_del, "CHECK": addresses.ipam_check}[command](
            request)

    # ------------------------------------------------------------------ main plugin

    @staticmethod
    def _pod_netns(netns: spec.Netns) -> int:
        """The descriptor of the pod's namespace for ADD and CHECK, or the spec's error."""
        error = spec.netns_error(netns)
        if error is not None:
            raise error
        assert netns.fd is not None
        if not workloads.is_network_namespace(netns.fd):
            raise CNIError(spec.INVALID_ENVIRONMENT, f"CNI_NETNS {netns.path} is not a network namespace")
        return netns.fd

    def _workload(self, request: Request, netns_fd: int) -> workloads.Workload:
        mtu = int(request.config.get("mtu") or self.default_mtu())
        host_if = workloads.host_interface_name(request.pod_namespace, request.pod_name, request.container_id)
        return workloads.Workload(host_if=host_if, pod_if=request.ifname, netns_fd=netns_fd, sandbox=request.netns,
                                  addresses=(), mtu=mtu, pod_mac=workloads.random_mac())

    def _wep_id(self, request: Request) -> tuple[str, str]:
        """(namespace, name) of the request's WorkloadEndpoint, by Calico's naming."""
        k8s = bool(request.pod_name)
        return request.pod_namespace or "cni", wep_name(self.node, "k8s" if k8s else "cni",
                                                        request.pod_name or request.container_id, request.ifname)

    def _is_own(self, wep: WorkloadEndpoint, request: Request) -> bool:
        return wep.container_id == request.container_id and wep.node == self.node

    async def _stored_wep(self, request: Request) -> WorkloadEndpoint | None:
        """The WorkloadEndpoint stored under the request's name (possibly another container's)."""
        kv = await self.addresses.datastore(self.ipam.store.get(wep_key(*self._wep_id(request))))
        return WorkloadEndpoint.from_v3(kv.json()) if kv is not None else None

    def _wep(self, request: Request, workload: workloads.Workload) -> WorkloadEndpoint:
        namespace, name = self._wep_id(request)
        return WorkloadEndpoint(
            namespace=namespace, node=self.node, container_id=request.container_id, name=name,
            pod=request.pod_name, endpoint=request.ifname, interface=workload.host_if,
            ip_networks=tuple(str(a) for a in workload.addresses), mac=workload.pod_mac,
            orchestrator="k8s" if request.pod_name else "cni")

    async def _add(self, request: Request, netns_fd: int) -> dict[str, Any]:
        """The datastore and the kernel work side by side: the veth pair (up, with the pod's routes) is made while
        IPAM allocates, and the endpoint record is written in IPAM's own transaction (or, for several addresses,
        while the pod's address is set). Only the host route waits for the record: the reconciler keeps the
        routes of recorded endpoints only, so a route plumbed before its record exists could be taken away by a
        reconcile running meanwhile."""
        workload = self._workload(request, netns_fd)
        wep: WorkloadEndpoint | None = None

        def record(addresses: list[ipaddress.IPv4Address | ipaddress.IPv6Address]) -> list[Put]:
            nonlocal wep
            wep = self._wep(request, with_addresses(workload, addresses))
            return [Put.json(wep.key, wep.to_v3())]

        try:
            families = tuple(v for v, wanted in zip((4, 6), self.addresses.families(request), strict=True) if wanted)
            index, allocation = await _all([
                self.kernel.create_link(workload, families),
                self.addresses.allocate(request, also=record)])
            addresses = allocation.addresses
            workload = with_addresses(workload, addresses)
            steps = [self.kernel.configure_pod(workload)]
            if not allocation.also_written:
                wep = self._wep(request, workload)
                steps.append(self.addresses.datastore(save_wep(self.ipam.store, wep)))
            await _all(steps)
            assert wep is not None
            self.on_endpoint(wep.key, wep)  # before the route: a reconcile keeps routes of known endpoints only
            await self.kernel.route_to_pod(workload, index)
        except BaseException as exc:
            await self._undo(workload, request, wep, datastore_down=isinstance(exc, DatastoreDown))
            if isinstance(exc, workloads.PlumbingError):
                raise CNIError(spec.IO_FAILURE, str(exc)) from None
            raise
        if self.ipam.stats["blocks_claimed"] != self._claimed:  # a new block needs its blackhole and announcement
            self._claimed = self.ipam.stats["blocks_claimed"]
            self.changed()
        log.info("cni ADD container=%s pod=%s/%s if=%s ips=%s", request.container_id, request.pod_namespace,
                 request.pod_name, workload.host_if, ",".join(str(a) for a in addresses))
        result = Result(
            interfaces=[spec.Interface(workload.host_if, workloads.HOST_MAC),
                        spec.Interface(request.ifname, workload.pod_mac, request.netns)],
            ips=[(a, 1, None) for a in workload.addresses],
            routes=[("0.0.0.0/0", workloads.GATEWAY_V4)] * any(a.version == 4 for a in addresses)
            + [("::/0", workloads.GATEWAY_V6)] * any(a.version == 6 for a in addresses),
        )
        return result.to_json(request.cni_version)

    async def _undo(self, workload: workloads.Workload, request: Request, wep: WorkloadEndpoint | None,
                    datastore_down: bool = False) -> None:
        """Take back whatever a failed ADD made; the ADD's own error is what the runtime hears, so a failure
        here is logged (what is left is found by the reconciler, ``ipam check`` and GC). With the datastore
        unreachable its part gets a short try only: the veth goes at once either way."""

        async def forget() -> None:
            records = [self.ipam.release_by_handle(request.handle_id)]
            if wep is not None:
                records.append(delete_wep(self.ipam.store, wep.namespace, wep.name))
                self.on_endpoint(wep.key, None)
            if not datastore_down:
                await _all(records)
                return
            try:
                await asyncio.wait_for(_all(records), timeout=UNDO_DATASTORE_SECONDS)
            except (TimeoutError, DatastoreUnavailable):
                # Nothing reached etcd unless a write committed just as the connection broke; then the handle
                # is left, and the runtime's DEL for this failed ADD (or ipam gc) releases it.
                log.warning("cni ADD %s: etcd still unreachable; handle %s released later by DEL or GC if any "
                            "of its writes landed", request.container_id, request.handle_id)

        steps: list[Awaitable[Any]] = [self.kernel.remove(workload.host_if), forget()]
        for outcome in await asyncio.gather(*steps, return_exceptions=True):
            if isinstance(outcome, BaseException):
                log.warning("cni ADD %s: cleaning up after the failure failed too: %s", request.container_id,
                            outcome)

    async def _del(self, request: Request) -> None:
        """The veth goes (its routes with it) while IPAM releases and the record is deleted: the kernel's veth
        teardown is the slow part. A record of another container under the same name (the pod was recreated)
        is left alone, and so is its veth."""
        wep = await self._stored_wep(request)
        mine = wep is not None and self._is_own(wep, request)
        steps: list[Awaitable[Any]] = [self.addresses.datastore(self.ipam.release_by_handle(request.handle_id))]
        if wep is None or mine:
            host_if = wep.interface if wep is not None else workloads.host_interface_name(
                request.pod_namespace, request.pod_name, request.container_id)
            steps.append(self.kernel.remove(host_if))
        if mine:
            steps.append(self.addresses.datastore(delete_wep(self.ipam.store, *self._wep_id(request))))
        await _all(steps)
        if mine:
            assert wep is not None
            self.on_endpoint(wep.key, None)
        log.info("cni DEL container=%s pod=%s/%s", request.container_id, request.pod_namespace, request.pod_name)
        # No reconcile needed: the pod's route went with its veth, and an emptied block stays with the node.

    async def _check(self, request: Request, netns_fd: int) -> None:
        held = await self.addresses.datastore(self.ipam.store.get(f"/calico/ipam/v2/handle/{request.handle_id}"))
        if held is None:
            raise CNIError(spec.UNKNOWN_CONTAINER, f"no addresses are held for {request.handle_id}")
        wep = await self._stored_wep(request)
        if wep is None or not self._is_own(wep, request):
            raise CNIError(spec.UNKNOWN_CONTAINER, f"no workload endpoint for container {request.container_id}")
        workload = workloads.Workload(host_if=wep.interface, pod_if=request.ifname, netns_fd=netns_fd,
                                      sandbox=request.netns,
                                      addresses=tuple(ipaddress.ip_interface(n) for n in wep.ip_networks),
                                      mtu=self.default_mtu())
        problems = await self.kernel.check(workload)
        if problems:
            raise CNIError(spec.IO_FAILURE, "; ".join(problems))

    async def _gc(self, request: Request) -> None:
        """CNI 1.1 GC: release what this network holds on this node for attachments the runtime no longer has."""
        valid = {f"{request.network}.{a.get('containerID')}" for a in request.config.get("cni.dev/valid-attachments")
                 or [] if isinstance(a, dict)}
        for wep in await self.addresses.datastore(list_node_weps(self.ipam.store, self.node)):
            handle = f"{request.network}.{wep.container_id}"
            if handle not in valid:
                await self.kernel.remove(wep.interface)
                await self.addresses.datastore(self.ipam.release_by_handle(handle))
                await self.addresses.datastore(delete_wep(self.ipam.store, wep.namespace, wep.name))
        # Addresses with no endpoint (an ADD or DEL cut short by a crash) are the network's too.
        await self.addresses.datastore(release_unattached(self.ipam, self.node, request.network, valid))
        self.changed()
