"""The daemon side of CNI: ADD / DEL / CHECK / STATUS / GC with warm etcd and netlink connections.

ADD is all or nothing: if a step after IPAM fails, the plumbing made so far is removed and the addresses are
released before the error goes back, so a runtime never sees a half-plumbed pod.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import logging
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from pyroute2 import IPRoute

from bgpd.cni import spec
from bgpd.cni.spec import CNIError, Request, Result
from bgpd.dataplane import workloads
from bgpd.resources import WorkloadEndpoint, delete_wep, list_node_weps, save_wep, wep_name
from ipam.allocator import IPAM
from ipam.errors import DatastoreUnavailable, IPAMError, NoEligiblePool, PoolExhausted

log = logging.getLogger("calico-py-node.cni")
T = TypeVar("T")
MAIN, IPAM_PLUGIN = "calico-py", "calico-py-ipam"


class Netlink:
    """One thread owns the node's netlink socket; every kernel change is queued to it (no locking needed)."""

    def __init__(self) -> None:
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="netlink")
        self._ipr: IPRoute | None = None

    def _get(self) -> IPRoute:
        if self._ipr is None:
            self._ipr = IPRoute()
        return self._ipr

    async def run(self, work: Callable[[IPRoute], T]) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._executor, lambda: work(self._get()))

    def close(self) -> None:
        self._executor.submit(lambda: self._ipr.close() if self._ipr else None).result()
        self._executor.shutdown()


class CNIHandler:
    def __init__(self, ipam: IPAM, node: str, netlink: Netlink, default_mtu: int,
                 changed: Callable[[], None] = lambda: None) -> None:
        self.ipam = ipam
        self.node = node
        self.netlink = netlink
        self.default_mtu = default_mtu
        self.changed = changed  # wakes the reconciler (a new block may need its blackhole)
        self._claimed = 0

    async def handle(self, plugin: str, env: dict[str, str], stdin: str) -> tuple[int, str]:
        version = spec.CURRENT_VERSION
        try:
            request = spec.parse_request(env, stdin)
            version = request.cni_version
            body = await self._dispatch(plugin, request)
            return 0, json.dumps(body) + "\n" if body is not None else ""
        except CNIError as exc:
            log.warning("cni %s %s failed: code=%s %s", env.get("CNI_COMMAND"), env.get("CNI_CONTAINERID"),
                        exc.code, exc.msg)
            return 1, json.dumps(exc.to_json(version)) + "\n"
        except Exception as exc:  # never let a bug leave the runtime without an answer
            log.exception("cni %s crashed", env.get("CNI_COMMAND"))
            return 1, json.dumps(CNIError(spec.INTERNAL, f"internal error: {exc}").to_json(version)) + "\n"

    async def _dispatch(self, plugin: str, request: Request) -> dict[str, Any] | None:
        command = request.command
        if command == "VERSION":
            return spec.version_result(request.cni_version)
        if command == "STATUS":
            await self._datastore(self.ipam.get_config())
            return None
        if command == "GC":
            await self._gc(request)
            return None
        if plugin == MAIN:
            ipam_type = (request.config.get("ipam") or {}).get("type", IPAM_PLUGIN)
            if ipam_type != IPAM_PLUGIN:
                raise CNIError(spec.INVALID_NETWORK_CONFIG, f"ipam type {ipam_type!r} is not supported by calico-py; "
                                                            f"use {IPAM_PLUGIN}")
            return await {"ADD": self._add, "DEL": self._del, "CHECK": self._check}[command](request)
        return await {"ADD": self._ipam_add, "DEL": self._ipam_del, "CHECK": self._ipam_check}[command](request)

    @staticmethod
    async def _datastore(call: Awaitable[T]) -> T:
        try:
            return await call
        except DatastoreUnavailable as exc:
            raise CNIError(spec.TRY_AGAIN_LATER, "datastore unreachable; try again later", str(exc)) from None
        except (PoolExhausted, NoEligiblePool) as exc:
            raise CNIError(spec.IPAM_EXHAUSTED, str(exc)) from None
        except IPAMError as exc:
            raise CNIError(spec.IO_FAILURE, str(exc)) from None

    # ------------------------------------------------------------------ IPAM

    def _families(self, request: Request) -> tuple[int, int]:
        ipam = request.config.get("ipam") or {}
        v4 = str(ipam.get("assign_ipv4", "true")).lower() == "true"
        v6 = str(ipam.get("assign_ipv6", "false")).lower() == "true"
        return int(v4), int(v6)

    async def _allocate(self, request: Request) -> list[ipaddress.IPv4Address | ipaddress.IPv6Address]:
        num_v4, num_v6 = self._families(request)
        attrs = {k: v for k, v in (("namespace", request.pod_namespace), ("pod", request.pod_name)) if v}
        pools = (request.config.get("ipam") or {}).get("ipv4_pools")
        result = await self._datastore(self.ipam.auto_assign(request.handle_id, self.node, num_v4, num_v6,
                                                              pools=pools, attrs=attrs))
        return result.addresses

    async def _ipam_add(self, request: Request) -> dict[str, Any]:
        addresses = await self._allocate(request)
        result = Result(ips=[(ipaddress.ip_interface(f"{a}/{a.max_prefixlen}"), -1, None) for a in addresses],
                        routes=[("0.0.0.0/0", None)] if any(a.version == 4 for a in addresses) else [])
        body = result.to_json(request.cni_version)
        for ip in body["ips"]:
            ip.pop("interface")
        return body

    async def _ipam_del(self, request: Request) -> None:
        await self._datastore(self.ipam.release_by_handle(request.handle_id))

    async def _ipam_check(self, request: Request) -> None:
        held = await self._datastore(self.ipam.store.get(f"/calico/ipam/v2/handle/{request.handle_id}"))
        if held is None:
            raise CNIError(spec.UNKNOWN_CONTAINER, f"no addresses are held for {request.handle_id}")

    # ------------------------------------------------------------------ main plugin

    def _workload(self, request: Request, addresses: list[Any]) -> workloads.Workload:
        mtu = int(request.config.get("mtu") or self.default_mtu)
        host_if = workloads.host_interface_name(request.pod_namespace, request.pod_name, request.container_id)
        return workloads.Workload(host_if=host_if, pod_if=request.ifname, netns=request.netns,
                                  addresses=tuple(ipaddress.ip_interface(f"{a}/{a.max_prefixlen}") for a in addresses),
                                  mtu=mtu, pod_mac=workloads.random_mac())

    def _wep(self, request: Request, workload: workloads.Workload, mac: str) -> WorkloadEndpoint:
        k8s = bool(request.pod_name)
        return WorkloadEndpoint(
            namespace=request.pod_namespace or "cni", node=self.node, container_id=request.container_id,
            name=wep_name(self.node, "k8s" if k8s else "cni", request.pod_name or request.container_id,
                          request.ifname),
            pod=request.pod_name, endpoint=request.ifname, interface=workload.host_if,
            ip_networks=tuple(str(a) for a in workload.addresses), mac=mac, orchestrator="k8s" if k8s else "cni")

    async def _add(self, request: Request) -> dict[str, Any]:
        addresses = await self._allocate(request)
        workload = self._workload(request, addresses)
        # The endpoint record goes first: the reconciler keeps the routes of recorded endpoints only, so a route
        # plumbed before its record exists could be taken away by a reconcile running meanwhile.
        wep = self._wep(request, workload, workload.pod_mac)
        try:
            await self._datastore(save_wep(self.ipam.store, wep))
            mac = await self.netlink.run(lambda ipr: workloads.add(ipr, workload))
        except BaseException as exc:
            await self._undo(workload, request, wep)
            if isinstance(exc, workloads.NetnsGone):
                raise CNIError(spec.UNKNOWN_CONTAINER, str(exc)) from None
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
                        spec.Interface(request.ifname, mac, request.netns)],
            ips=[(a, 1, None) for a in workload.addresses],
            routes=[("0.0.0.0/0", workloads.GATEWAY_V4)] * any(a.version == 4 for a in addresses)
            + [("::/0", workloads.GATEWAY_V6)] * any(a.version == 6 for a in addresses),
        )
        return result.to_json(request.cni_version)

    async def _undo(self, workload: workloads.Workload, request: Request, wep: WorkloadEndpoint) -> None:
        try:
            await self.netlink.run(lambda ipr: workloads.remove(ipr, workload.host_if))
            await delete_wep(self.ipam.store, wep.namespace, wep.name)
        finally:
            await self.ipam.release_by_handle(request.handle_id)

    async def _del(self, request: Request) -> None:
        weps = [w for w in await self._datastore(list_node_weps(self.ipam.store, self.node))
                if w.container_id == request.container_id and w.endpoint == request.ifname]
        names = {w.interface for w in weps}
        names.add(workloads.host_interface_name(request.pod_namespace, request.pod_name, request.container_id))
        for name in names:
            await self.netlink.run(lambda ipr, name=name: workloads.remove(ipr, name))
        await self._datastore(self.ipam.release_by_handle(request.handle_id))
        for wep in weps:
            await self._datastore(delete_wep(self.ipam.store, wep.namespace, wep.name))
        log.info("cni DEL container=%s pod=%s/%s", request.container_id, request.pod_namespace, request.pod_name)
        # No reconcile needed: the pod's route went with its veth, and an emptied block stays with the node.

    async def _check(self, request: Request) -> None:
        held = await self._datastore(self.ipam.store.get(f"/calico/ipam/v2/handle/{request.handle_id}"))
        if held is None:
            raise CNIError(spec.UNKNOWN_CONTAINER, f"no addresses are held for {request.handle_id}")
        weps = [w for w in await self._datastore(list_node_weps(self.ipam.store, self.node))
                if w.container_id == request.container_id and w.endpoint == request.ifname]
        if not weps:
            raise CNIError(spec.UNKNOWN_CONTAINER, f"no workload endpoint for container {request.container_id}")
        workload = workloads.Workload(host_if=weps[0].interface, pod_if=request.ifname, netns=request.netns,
                                      addresses=tuple(ipaddress.ip_interface(n) for n in weps[0].ip_networks),
                                      mtu=self.default_mtu)
        problems = await self.netlink.run(lambda ipr: workloads.check(ipr, workload))
        if problems:
            raise CNIError(spec.IO_FAILURE, "; ".join(problems))

    async def _gc(self, request: Request) -> None:
        """CNI 1.1 GC: release what this network holds on this node for attachments the runtime no longer has."""
        valid = {f"{request.network}.{a.get('containerID')}" for a in request.config.get("cni.dev/valid-attachments")
                 or [] if isinstance(a, dict)}
        for wep in await self._datastore(list_node_weps(self.ipam.store, self.node)):
            handle = f"{request.network}.{wep.container_id}"
            if handle not in valid:
                await self.netlink.run(lambda ipr, name=wep.interface: workloads.remove(ipr, name))
                await self._datastore(self.ipam.release_by_handle(handle))
                await self._datastore(delete_wep(self.ipam.store, wep.namespace, wep.name))
        self.changed()
