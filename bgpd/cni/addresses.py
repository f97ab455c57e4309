"""The IPAM side of CNI: which addresses a pod gets (its and its namespace's annotations, fixed addresses, the
network's pools) and the ``calico-py-ipam`` plugin's ADD / DEL / CHECK; datastore errors become CNI errors."""

from __future__ import annotations

import asyncio
import ipaddress
from collections.abc import Awaitable
from typing import Any, TypeVar

from bgpd.cni import spec
from bgpd.cni.annotations import AnnotationError, PodRequest, PodSource, pod_request, unknown_pools
from bgpd.cni.spec import CNIError, Request, Result
from ipam.allocator import IPAM, AssignResult, Extra
from ipam.errors import DatastoreUnavailable, IPAMError, NoEligiblePool, PoolExhausted
from ipam.pools import list_pools

T = TypeVar("T")


class DatastoreDown(CNIError):
    """The datastore did not answer within its failover time (code 11, try again later)."""


class PodAddresses:
    def __init__(self, ipam: IPAM, node: str, pods: PodSource | None = None) -> None:
        self.ipam = ipam
        self.node = node
        self.pods = pods  # the Kubernetes API (pod and namespace annotations), when the node runs in a cluster

    async def datastore(self, call: Awaitable[T]) -> T:
        try:
            return await call
        except DatastoreUnavailable as exc:
            endpoints = ",".join(self.ipam.store.config.endpoints)
            raise DatastoreDown(spec.TRY_AGAIN_LATER, f"etcd datastore unreachable at {endpoints}: check that "
                                                      "etcd is running and reachable, then retry", str(exc)) from None
        except (PoolExhausted, NoEligiblePool) as exc:
            raise CNIError(spec.IPAM_EXHAUSTED, str(exc)) from None
        except IPAMError as exc:
            raise CNIError(spec.IO_FAILURE, str(exc)) from None

    def families(self, request: Request) -> tuple[int, int]:
        ipam = request.config.get("ipam") or {}
        v4 = str(ipam.get("assign_ipv4", "true")).lower() == "true"
        v6 = str(ipam.get("assign_ipv6", "false")).lower() == "true"
        return int(v4), int(v6)

    async def allocate(self, request: Request, also: Extra | None = None) -> AssignResult:
        num_v4, num_v6 = self.families(request)
        wanted = await self.pod_request(request)
        attrs = {k: v for k, v in (("namespace", request.pod_namespace), ("pod", request.pod_name)) if v}
        attrs.update(wanted.attributes)
        if wanted.fixed:
            for address in wanted.fixed:
                await self.datastore(self.ipam.assign_ip(address, request.handle_id, self.node, attrs=attrs))
            return AssignResult(ipv4=[a for a in wanted.fixed if a.version == 4],
                                ipv6=[a for a in wanted.fixed if a.version == 6])
        pools = [*(wanted.ipv4_pools or ()), *(wanted.ipv6_pools or ())] or None
        if pools:
            existing = await self.datastore(list_pools(self.ipam.store))
            missing = unknown_pools(pools, [p.name for p in existing], [str(p.cidr) for p in existing])
            if missing:
                raise CNIError(spec.INVALID_NETWORK_CONFIG, f"IP pool {', '.join(missing)} requested for "
                                                            f"{request.pod_namespace}/{request.pod_name} does not "
                                                            "exist; create it or fix the annotation")
        return await self.datastore(self.ipam.auto_assign(request.handle_id, self.node, num_v4, num_v6,
                                                            pools=pools, attrs=attrs, also=also))

    async def pod_request(self, request: Request) -> PodRequest:
        """The pools, fixed addresses and labels the pod's (and its namespace's) annotations ask for."""
        config_pools = (request.config.get("ipam") or {}).get("ipv4_pools")
        if self.pods is None or not request.pod_name:
            return PodRequest(ipv4_pools=tuple(config_pools) if config_pools else None)
        pods = self.pods
        try:
            pod = await asyncio.to_thread(pods.get_pod, request.pod_namespace, request.pod_name)
            namespace = await asyncio.to_thread(pods.namespace_annotations, request.pod_namespace)
        except Exception as exc:  # the adapter's errors are one-line already
            raise CNIError(spec.TRY_AGAIN_LATER, "Kubernetes API unreachable; try again later", str(exc)) from None
        try:
            return pod_request(pod.annotations if pod else {}, namespace, pod.labels if pod else {}, config_pools)
        except AnnotationError as exc:
            raise CNIError(spec.INVALID_NETWORK_CONFIG, str(exc)) from None

    async def ipam_add(self, request: Request) -> dict[str, Any]:
        addresses = (await self.allocate(request)).addresses
        result = Result(ips=[(ipaddress.ip_interface(f"{a}/{a.max_prefixlen}"), -1, None) for a in addresses],
                        routes=[("0.0.0.0/0", None)] if any(a.version == 4 for a in addresses) else [])
        body = result.to_json(request.cni_version)
        for ip in body["ips"]:
            ip.pop("interface")
        return body

    async def ipam_del(self, request: Request) -> None:
        await self.datastore(self.ipam.release_by_handle(request.handle_id))

    async def ipam_check(self, request: Request) -> None:
        held = await self.datastore(self.ipam.store.get(f"/calico/ipam/v2/handle/{request.handle_id}"))
        if held is None:
            raise CNIError(spec.UNKNOWN_CONTAINER, f"no addresses are held for {request.handle_id}")
