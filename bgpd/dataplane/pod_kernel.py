"""The kernel as the CNI handler sees it: a pod's veth made, its side configured, its host route added, its veth
checked or removed. A fake in the tests records what the handler asks for."""

from __future__ import annotations

from typing import Protocol

from bgpd.dataplane import workloads
from bgpd.dataplane.kernel import Netlink


class PodKernel(Protocol):
    async def create_link(self, workload: workloads.Workload, families: tuple[int, ...]) -> int: ...  # host index

    async def configure_pod(self, workload: workloads.Workload) -> None: ...

    async def route_to_pod(self, workload: workloads.Workload, index: int) -> None: ...

    async def remove(self, host_if: str) -> bool: ...  # True when there was one

    async def check(self, workload: workloads.Workload) -> list[str]: ...  # what is wrong


class NetlinkPods:
    """:class:`PodKernel` on the node's netlink thread."""

    def __init__(self, netlink: Netlink) -> None:
        self.netlink = netlink

    async def create_link(self, workload: workloads.Workload, families: tuple[int, ...]) -> int:
        return await self.netlink.run(lambda ipr: workloads.create_link(ipr, workload, families))

    async def configure_pod(self, workload: workloads.Workload) -> None:
        await self.netlink.run(lambda _: workloads.configure_pod(workload))

    async def route_to_pod(self, workload: workloads.Workload, index: int) -> None:
        await self.netlink.run(lambda _: workloads.route_to_pod(workload, index))

    async def remove(self, host_if: str) -> bool:
        return bool(await self.netlink.run(lambda ipr: workloads.remove(ipr, host_if)))

    async def check(self, workload: workloads.Workload) -> list[str]:
        return list(await self.netlink.run(lambda ipr: workloads.check(ipr, workload)))
